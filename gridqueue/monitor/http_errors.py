"""How the dashboard answers when it cannot do what was asked.

The API always answers ``{"error": "...", "detail": ...}``: ``error`` says what went wrong
and what to do, ``detail`` the specifics (the value refused, the choices). A page answers
the same words as an error page. Bad input is a 4xx, never a 500; a Redis that cannot be
reached is a 503 that names it (password masked).
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from gridqueue.errors import (
    InvalidJobError,
    JobNotFoundError,
    RedisUnavailableError,
    WorkerNotFoundError,
)
from gridqueue.logs import get_logger

_log = get_logger("gridqueue.dashboard")

# Paths answered in JSON even when a browser asks.
_JSON_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json")


class ApiError(Exception):
    """An answer other than 2xx: the error the client sees, and what to do."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


def error_reply(
    request: Request,
    status: int,
    error: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    path = request.url.path
    if path.startswith("/api/") or path == "/api" or path in _JSON_PATHS:
        reply = {"error": error, "detail": jsonable_encoder(detail)}
        return JSONResponse(reply, status_code=status, headers=headers)
    pages = request.app.state.dashboard.pages
    page: Response = pages.error(request, status, error, detail, headers)
    return page


def _redis_url(request: Request) -> str:
    return str(request.app.state.dashboard.settings.redis_url)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_reply(request, exc.status, exc.error, exc.detail, exc.headers)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_reply(request, 404, str(exc))

    async def conflict(request: Request, exc: Exception) -> Response:
        return error_reply(request, 409, str(exc))

    async def unavailable(request: Request, exc: Exception) -> Response:
        error = str(RedisUnavailableError(_redis_url(request), exc))
        return error_reply(request, 503, error, {"redis": False})

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        where = ("query", "body", "path", "header")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in where) or 'body'}: "
            f"{e.get('msg', 'invalid')}"
            for e in errors
        )
        return error_reply(
            request,
            422,
            f"invalid request ({problems}); fix the parameters named",
            [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors],
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        words = {
            404: f"no such page {path}: see / for the pages, GET /openapi.json for the API",
            405: f"{request.method} is not allowed on {path}"
            + ("; actions are POST only" if request.method == "GET" else ""),
        }
        headers = dict(exc.headers) if exc.headers else None
        return error_reply(
            request, exc.status_code, words.get(exc.status_code, str(exc.detail)), None, headers
        )

    async def crashed(request: Request, exc: Exception) -> Response:
        _log.error("dashboard.error", path=request.url.path, error=repr(exc), exc_info=exc)
        return error_reply(
            request,
            500,
            f"the dashboard failed on this request ({type(exc).__name__}); its log has the "
            "traceback",
        )

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(JobNotFoundError, not_found)
    app.add_exception_handler(WorkerNotFoundError, not_found)
    app.add_exception_handler(InvalidJobError, conflict)
    app.add_exception_handler(redis.ConnectionError, unavailable)
    app.add_exception_handler(redis.TimeoutError, unavailable)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crashed)
