"""The dashboard and its JSON API: one FastAPI app, one route table.

Every page (``/``, ``/workers``, ``/jobs``...) is rendered on the server from the same
read as its JSON twin under ``/api/...``, both from :class:`FleetView`. Pages stay live
through ``/api/stream``, Server-Sent Events that tail the ledger's event stream: the
browser patches the element a transition names at once, then fetches the page's live
part again (throttled).

Actions (quarantine, drain, release, cancel, replay) are POST only and call the same
ledger verbs as the CLI, recorded as done by ``dashboard``. They need
``Authorization: Bearer <GRIDQUEUE_DASHBOARD_TOKEN>``; without a configured token the
dashboard is read-only. A bearer header is never sent by a browser on its own, so a page
of another site cannot post an action either.
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, cast
from urllib.parse import quote, urlencode

import redis
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from redis.backoff import NoBackoff
from redis.retry import Retry
from starlette.responses import StreamingResponse

from gridqueue import __version__
from gridqueue.celeryapp import celery_for
from gridqueue.dispatch import Dispatcher
from gridqueue.errors import (
    InvalidJobError,
    InvalidModelError,
    JobNotFoundError,
    RedisUnavailableError,
    WorkerNotFoundError,
)
from gridqueue.handlers import check_model_name
from gridqueue.keys import attempt_id
from gridqueue.ledger import Ledger
from gridqueue.logs import get_logger
from gridqueue.monitor import schemas
from gridqueue.monitor.http_errors import ApiError, install_error_handlers
from gridqueue.monitor.live import STREAM_ID, LiveStreams
from gridqueue.monitor.pages import Pages
from gridqueue.monitor.views import MAX_LIMIT, FleetView
from gridqueue.settings import Settings
from gridqueue.states import JobState, WorkerState

_log = get_logger("gridqueue.dashboard")

OPERATOR = "dashboard"
MAX_STREAMS = 64  # each live page holds one Redis connection
READ_ONLY_HOW = (
    "set GRIDQUEUE_DASHBOARD_TOKEN to a long random string and restart `gridqueue "
    "dashboard`, then send it as `Authorization: Bearer <token>`"
)


@dataclass
class Dashboard:
    """What every route needs: settings, the read side, the ledger, the pages."""

    settings: Settings
    view: FleetView
    ledger: Ledger
    pages: Pages
    streams: LiveStreams
    ping: redis.Redis  # readiness: one short try, no retries
    metrics_registry: Any = None
    dispatcher: Dispatcher | None = None

    def client_exists(self, job_id: str) -> bool:
        return bool(self.ledger.client.exists(self.ledger.keys.job(job_id)))

    def publish(self, job_id: str, attempt: int) -> bool:
        """Publish a replayed attempt now, as the CLI does; if this fails, the watchdog
        publishes it (its dispatch is due)."""
        try:
            if self.dispatcher is None:
                app = celery_for(self.settings)
                self.dispatcher = Dispatcher(self.ledger, app)
            return self.dispatcher.publish(attempt_id(job_id, attempt))
        except Exception as exc:  # the replay is committed; the watchdog publishes it
            _log.warning("dashboard.publish_failed", job=job_id, attempt=attempt, error=repr(exc))
            return False

    def page(self, request: Request, template: str, **context: Any) -> HTMLResponse:
        if context.get("now_ms") is None:
            try:
                context["now_ms"] = self.ledger.time_ms()
            except redis.RedisError:  # the page says what failed; the clock is not it
                context["now_ms"] = None
        return self.pages.render(request, template, **context)


def _read_only(settings: Settings) -> bool:
    token = settings.dashboard_token
    return token is None or not token.get_secret_value().strip()


def _dashboard(request: Request) -> Dashboard:
    return cast(Dashboard, request.app.state.dashboard)


Dash = Annotated[Dashboard, Depends(_dashboard)]
_bearer = HTTPBearer(auto_error=False, description="GRIDQUEUE_DASHBOARD_TOKEN")


def _operator(
    request: Request,
    dash: Dash,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Admit an action: 403 while the dashboard is read-only, 401 without the token."""
    token = dash.settings.dashboard_token
    if token is None or _read_only(dash.settings):
        raise ApiError(
            403,
            f"the dashboard is read-only, so actions are disabled: to enable them, {READ_ONLY_HOW}",
            {"how_to_enable": READ_ONLY_HOW},
        )
    given = credentials.credentials.strip() if credentials else ""
    expected = token.get_secret_value().strip()  # a token read from a file ends in a newline
    if not given or not secrets.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "missing or wrong token: send `Authorization: Bearer <GRIDQUEUE_DASHBOARD_TOKEN>`",
            None,
            {"WWW-Authenticate": 'Bearer realm="gridqueue"'},
        )
    client = request.client.host if request.client else "unknown"
    return f"{OPERATOR}:{client}"


Operator = Annotated[str, Depends(_operator)]


# -- reads shared by pages and their JSON twins ------------------------------------------


@dataclass(frozen=True)
class JobFilter:
    state: str | None
    model: str | None
    workload: str | None
    worker: str | None
    cursor: str | None
    limit: int

    def query(self, **change: Any) -> str:
        """This filter as a query string, with ``change`` applied (``None`` drops one)."""
        values = {
            "state": self.state,
            "model": self.model,
            "workload": self.workload,
            "worker": self.worker,
            "cursor": self.cursor,
            "limit": self.limit if self.limit != 50 else None,
            **change,
        }
        return urlencode({k: v for k, v in values.items() if v not in (None, "")})


def _blank(value: str | None) -> str | None:
    value = value.strip() if value is not None else None
    return value or None


def job_filter(
    dash: Dash,
    state: Annotated[
        str | None, Query(description="QUEUED, RUNNING, SUCCEEDED, FAILED, EXPIRED...")
    ] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    workload: Annotated[str | None, Query(max_length=64, description="A workload class.")] = None,
    worker: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> JobFilter:
    state, model, workload = _blank(state), _blank(model), _blank(workload)
    if state is not None:
        known = [s.value for s in JobState]
        if state.upper() not in known:
            raise ApiError(
                422,
                f"unknown job state {state!r}: use one of {', '.join(known)}",
                {"param": "state", "allowed": known},
            )
        state = state.upper()
    if model is not None:
        try:
            check_model_name(model)
        except InvalidModelError as exc:
            raise ApiError(422, str(exc), {"param": "model"}) from None
    if workload is not None and workload not in dash.ledger.workloads:
        known = sorted(dash.ledger.workloads)
        raise ApiError(
            422,
            f"unknown workload class {workload!r}: use one of {', '.join(known)}",
            {"param": "workload", "allowed": known},
        )
    return JobFilter(state, model, workload, _blank(worker), _blank(cursor), limit)


Jobs = Annotated[JobFilter, Depends(job_filter)]


def _jobs(dash: Dashboard, where: JobFilter) -> dict[str, Any]:
    try:
        return dash.view.jobs(
            state=where.state,
            model=where.model,
            workload=where.workload,
            worker=where.worker,
            limit=where.limit,
            cursor=where.cursor,
        )
    except ValueError as exc:  # a cursor from another listing, a state the view refuses
        raise ApiError(
            400, f"{exc}; start again without ?cursor=", {"cursor": where.cursor}
        ) from None


def _dead_letters(
    dash: Dashboard, reason: str | None, model: str | None, limit: int
) -> dict[str, Any]:
    if model is not None:
        try:
            check_model_name(model)
        except InvalidModelError as exc:
            raise ApiError(422, str(exc), {"param": "model"}) from None
    return dash.view.dead_letters(reason=reason, model=model, limit=limit)


# -- pages ---------------------------------------------------------------------------------


pages = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


@pages.get("/")
def overview_page(request: Request, dash: Dash) -> HTMLResponse:
    data = dash.view.overview()
    return dash.page(request, "overview.html", nav="overview", o=data, now_ms=data["now_ms"])


# A page of the workers table: a thousand rows, each with its GPUs, is megabytes of HTML,
# and a browser re-rendering that on every refresh answers live updates late.
WORKERS_PER_PAGE = 100


@pages.get("/workers")
def workers_page(
    request: Request,
    dash: Dash,
    state: Annotated[str | None, Query(description="ALIVE, QUARANTINED, PROBATION...")] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    everyone = dash.view.workers()
    by_state: dict[str, int] = {}
    for w in everyone:
        by_state[w["state"]] = by_state.get(w["state"], 0) + 1
    state = _blank(state)
    if state is not None:
        state = state.upper()
        if state not in by_state and state not in {s.value for s in WorkerState}:
            known = [s.value for s in WorkerState]
            raise ApiError(
                422,
                f"unknown worker state {state!r}: use one of {', '.join(known)}",
                {"param": "state", "allowed": known},
            )
    shown = [w for w in everyone if state is None or w["state"] == state]
    pages_total = max(1, -(-len(shown) // WORKERS_PER_PAGE))
    page = min(page, pages_total)
    first = (page - 1) * WORKERS_PER_PAGE
    return dash.page(
        request,
        "workers.html",
        nav="workers",
        workers=shown[first : first + WORKERS_PER_PAGE],
        total=len(everyone),
        matching=len(shown),
        by_state=by_state,
        state=state,
        page=page,
        pages_total=pages_total,
        first=first,
    )


@pages.get("/workers/{name}")
def worker_page(request: Request, dash: Dash, name: str) -> HTMLResponse:
    return dash.page(request, "worker.html", nav="workers", w=dash.view.worker(name))


@pages.get("/jobs", response_model=None)
def jobs_page(
    request: Request,
    dash: Dash,
    where: Jobs,
    job_id: Annotated[str | None, Query(alias="id", max_length=200)] = None,
) -> Response:
    job_id = _blank(job_id)
    if job_id is not None:  # the search box: straight to the job, or a clear 404
        if not dash.client_exists(job_id):
            dash.view.job(job_id)  # the 404, with its message
        return RedirectResponse(f"/jobs/{quote(job_id, safe='')}", status_code=303)
    listing = _jobs(dash, where)
    return dash.page(
        request,
        "jobs.html",
        nav="jobs",
        where=where,
        listing=listing,
        states=[s.value for s in JobState],
        workloads=sorted(dash.ledger.workloads),
    )


@pages.get("/jobs/{job_id}")
def job_page(request: Request, dash: Dash, job_id: str) -> HTMLResponse:
    return dash.page(request, "job.html", nav="jobs", job=dash.view.job(job_id))


@pages.get("/failovers")
def failovers_page(
    request: Request, dash: Dash, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50
) -> HTMLResponse:
    incidents = dash.view.failovers(limit=limit)
    return dash.page(request, "failovers.html", nav="failovers", incidents=incidents)


@pages.get("/dead-letters")
def dead_letters_page(
    request: Request,
    dash: Dash,
    reason: Annotated[str | None, Query(max_length=200)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 200,
) -> HTMLResponse:
    reason, model = _blank(reason), _blank(model)
    letters = _dead_letters(dash, reason, model, limit)
    return dash.page(
        request,
        "dead_letters.html",
        nav="dead-letters",
        letters=letters,
        reason=reason,
        model=model,
    )


# -- the JSON API ------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorReply, "description": why}
    for code, why in (
        (404, "No such job or worker."),
        (422, "A parameter was refused; the error says which and what is allowed."),
        (503, "Redis cannot be reached."),
    )
}
_ACTION_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    **{
        code: {"model": schemas.ErrorReply, "description": why}
        for code, why in (
            (401, "Missing or wrong bearer token."),
            (403, "The dashboard is read-only: GRIDQUEUE_DASHBOARD_TOKEN is not set."),
            (409, "The action does not apply in the current state (the error says why)."),
        )
    },
}


def _doc(model: type[Any]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model}, **_ERRORS}


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(jsonable_encoder(data), status_code=status)


api = APIRouter(prefix="/api", tags=["read"], default_response_class=JSONResponse)
actions = APIRouter(prefix="/api", tags=["actions"], responses=_ACTION_ERRORS)


@api.get("/overview", responses=_doc(schemas.Overview))
def overview(dash: Dash) -> JSONResponse:
    """Workers and jobs by state, queue depths, running attempts, recent rates."""
    return _json(dash.view.overview())


@api.get("/workers", responses=_doc(list[schemas.WorkerSummary]))
def workers(
    dash: Dash,
    gone_s: Annotated[
        float | None,
        Query(ge=0, le=30 * 86_400, description="Also list workers gone this long ago."),
    ] = None,
) -> JSONResponse:
    """Every worker: state, health verdict and reasons, heartbeat age, GPUs."""
    return _json(dash.view.workers(gone_s))


@api.get("/workers/{name}", responses=_doc(schemas.WorkerDetail))
def worker(dash: Dash, name: Annotated[str, PathParam(max_length=200)]) -> JSONResponse:
    """One worker, with its history (newest first)."""
    return _json(dash.view.worker(name))


@api.get("/jobs", responses=_doc(schemas.JobPage))
def jobs(dash: Dash, where: Jobs) -> JSONResponse:
    """Jobs newest first, filtered; page on with ``?cursor=<next_cursor>``."""
    return _json(_jobs(dash, where))


@api.get("/jobs/{job_id}", responses=_doc(schemas.JobDetail))
def job(dash: Dash, job_id: Annotated[str, PathParam(max_length=200)]) -> JSONResponse:
    """One job: its record, every attempt on a timeline, the result or the error."""
    return _json(dash.view.job(job_id))


@api.get("/failovers", responses=_doc(list[schemas.Incident]))
def failovers(dash: Dash, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50) -> JSONResponse:
    """One row per incident: the fault, its verdict, the requeues and the jobs moved."""
    return _json(dash.view.failovers(limit=limit))


@api.get("/dead-letters", responses=_doc(schemas.DeadLetters))
def dead_letters(
    dash: Dash,
    reason: Annotated[str | None, Query(max_length=200)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 200,
) -> JSONResponse:
    """Dead-lettered jobs grouped by reason, with the evidence."""
    return _json(_dead_letters(dash, _blank(reason), _blank(model), limit))


@actions.post("/workers/{name}/quarantine", response_model=schemas.WorkerActionReply)
def quarantine(
    dash: Dash, by: Operator, name: str, body: schemas.QuarantineRequest
) -> schemas.WorkerActionReply:
    """No new work for the worker; its running attempts move elsewhere now."""
    moved = _worker_action(dash, name, lambda: dash.ledger.quarantine(name, by, body.reason))
    _log.info("dashboard.quarantine", worker=name, by=by, reason=body.reason, moved=moved)
    return schemas.WorkerActionReply(worker=name, action="quarantine", by=by, attempts_moved=moved)


@actions.post("/workers/{name}/drain", response_model=schemas.WorkerActionReply)
def drain(
    dash: Dash, by: Operator, name: str, body: schemas.DrainRequest | None = None
) -> schemas.WorkerActionReply:
    """No new work for the worker; its running attempts finish where they are."""
    reason = body.reason if body else "drain"
    _worker_action(dash, name, lambda: dash.ledger.quarantine(name, by, reason, drain=True))
    _log.info("dashboard.drain", worker=name, by=by, reason=reason)
    return schemas.WorkerActionReply(worker=name, action="drain", by=by)


@actions.post("/workers/{name}/release", response_model=schemas.WorkerActionReply)
def release(dash: Dash, by: Operator, name: str) -> schemas.WorkerActionReply:
    """Re-admit a quarantined (or probationary) worker now."""
    if not _worker_action(dash, name, lambda: int(dash.ledger.release(name, by))):
        record = dash.ledger.worker(name)
        state = record.state.value if record else None
        raise ApiError(
            409,
            f"worker {name!r} is {state}, not QUARANTINED or PROBATION: nothing to release",
            {"state": state},
        )
    _log.info("dashboard.release", worker=name, by=by)
    return schemas.WorkerActionReply(worker=name, action="release", by=by)


def _worker_action(dash: Dashboard, name: str, act: Callable[[], int]) -> int:
    if dash.ledger.worker(name) is None:
        raise ApiError(
            404, f"no worker {name!r} is registered: GET /api/workers lists them", {"worker": name}
        )
    try:
        return act()
    except WorkerNotFoundError as exc:  # registered, but DEAD or STOPPED
        raise ApiError(409, str(exc), {"worker": name}) from None


@actions.post("/jobs/{job_id}/cancel", response_model=schemas.CancelReply)
def cancel(dash: Dash, by: Operator, job_id: str) -> schemas.CancelReply:
    """Cancel a job; its running attempt is killed."""
    if not dash.ledger.cancel(job_id, reason=f"cancelled by {by}"):
        state = dash.ledger.get(job_id).state.value
        raise ApiError(409, f"job {job_id} had already ended {state}", {"state": state})
    _log.info("dashboard.cancel", job=job_id, by=by)
    return schemas.CancelReply(job=job_id, cancelled=True)


@actions.post("/dead-letters/{job_id}/replay", response_model=schemas.ReplayReply)
def replay(dash: Dash, by: Operator, job_id: str) -> schemas.ReplayReply:
    """Run a dead-lettered job again as a fresh attempt chain, published at once."""
    attempt = dash.ledger.replay(job_id, by)
    dash.publish(job_id, attempt)
    _log.info("dashboard.replay", job=job_id, by=by, attempt=attempt)
    return schemas.ReplayReply(job=job_id, attempt=attempt, by=by)


@actions.post("/dead-letters/replay", response_model=schemas.ReplayManyReply)
def replay_matching(
    dash: Dash, by: Operator, body: schemas.ReplayFilter
) -> schemas.ReplayManyReply:
    """Replay every dead letter that matches the filter; reports each job."""
    if body.reason is None and body.model is None and not body.all:
        raise ApiError(
            422,
            'name a filter ("reason" or "model"), or send "all": true to replay every dead letter',
            {"filter": body.model_dump()},
        )
    letters = _dead_letters(dash, body.reason, body.model, body.limit)
    matched = [job["id"] for group in letters["groups"] for job in group["jobs"]]
    report = schemas.ReplayManyReply(
        filter=body.model_dump(exclude_defaults=True), matched=len(matched), replayed=[], failed=[]
    )
    for job_id in matched:
        try:
            attempt = dash.ledger.replay(job_id, by)
        except (InvalidJobError, JobNotFoundError) as exc:  # replayed or gone meanwhile
            report.failed.append(schemas.ReplayFailure(job=job_id, error=str(exc)))
        else:
            dash.publish(job_id, attempt)
            report.replayed.append(schemas.ReplayReply(job=job_id, attempt=attempt, by=by))
    _log.info("dashboard.replay_many", by=by, replayed=len(report.replayed), matched=len(matched))
    return report


# -- live updates ------------------------------------------------------------------------


@api.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: one `message` per ledger transition, its data "
            "the event as JSON ({id, type, ts, ...fields}); a `ready` event first.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **_ERRORS,
    },
)
async def stream(
    dash: Dash,
    after: Annotated[
        str | None, Query(pattern=STREAM_ID.pattern, description="Resume after this event id.")
    ] = None,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> StreamingResponse:
    """Every ledger transition from now on (or after ``?after=``), as it happens."""
    if last_event_id is not None and STREAM_ID.match(last_event_id):
        after = last_event_id  # the browser's reconnect: carry on where it was
    if dash.streams.full:
        raise ApiError(503, f"too many live pages ({MAX_STREAMS}); close some and reload")
    return StreamingResponse(
        dash.streams.tail(after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- probes and metrics ------------------------------------------------------------------

probes = APIRouter(tags=["probes"])


@probes.get("/healthz", response_model=schemas.Health)
def healthz() -> schemas.Health:
    """The process is up (says nothing of Redis)."""
    return schemas.Health(status="ok")


@probes.get(
    "/readyz",
    response_model=schemas.Ready,
    responses={503: {"model": schemas.ErrorReply, "description": "Redis cannot be reached."}},
)
def readyz(dash: Dash) -> schemas.Ready:
    """Redis answers: the dashboard can serve its pages."""
    try:
        seconds, micros = dash.ping.time()
    except redis.RedisError as exc:
        raise ApiError(
            503,
            str(RedisUnavailableError(dash.settings.redis_url, exc)),
            {"redis": False},
        ) from None
    return schemas.Ready(status="ready", redis=True, now_ms=int(seconds) * 1000 + micros // 1000)


@probes.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
def metrics(dash: Dash) -> Response:
    """Prometheus metrics of the fleet."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if dash.metrics_registry is None:
        try:  # imported when first asked for: the pages work without it
            module = importlib.import_module("gridqueue.monitor.metrics")
        except ImportError as exc:
            raise ApiError(
                503, "metrics are not available in this installation", {"missing": str(exc)}
            ) from None
        dash.metrics_registry = module.make_registry(dash.view)
    return Response(generate_latest(dash.metrics_registry), media_type=CONTENT_TYPE_LATEST)


# -- the app -----------------------------------------------------------------------------


def create_app(
    settings: Settings, view: FleetView | None = None, ledger: Ledger | None = None
) -> FastAPI:
    """The dashboard for the ledger at ``settings.redis_url``. Pass ``view`` and ``ledger``
    to share clients (tests); nothing connects until the first request."""
    if ledger is None:
        ledger = Ledger.connect(settings)
    if view is None:
        view = FleetView(ledger)
    app = FastAPI(
        title="gridqueue dashboard",
        version=__version__,
        description="The fleet, its jobs, failovers and dead letters, and the operator's "
        "actions. Actions need `Authorization: Bearer <GRIDQUEUE_DASHBOARD_TOKEN>`.",
        # The interactive docs load their scripts from a CDN: the schema is enough.
        docs_url=None,
        redoc_url=None,
    )
    app.state.dashboard = Dashboard(
        settings=settings,
        view=view,
        ledger=ledger,
        pages=Pages(
            read_only=_read_only(settings), read_only_how=READ_ONLY_HOW, version=__version__
        ),
        streams=LiveStreams(
            settings.redis_target,
            ledger.keys.events,
            client_name=f"{settings.namespace}-dashboard-stream",
            limit=MAX_STREAMS,
        ),
        ping=settings.redis_target.client(
            socket_connect_timeout=2.0,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        ),
    )
    app.mount("/static", StaticFiles(packages=[("gridqueue.monitor", "static")]), name="static")
    for router in (pages, api, actions, probes):
        app.include_router(router)
    install_error_handlers(app)
    return app
