"""HTML for the dashboard: the Jinja environment and its filters, and the rendering of a
whole page, of its live part alone (what the page's script fetches again after a
transition), or of an error page.

Templates and assets ship in the package (``templates/``, ``static/``): no CDN and no
inline script, which the Content-Security-Policy of every page enforces.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

# The page's script asks for the live part alone with this header.
FRAGMENT_HEADER = "x-gridqueue-fragment"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


class Pages:
    """Renders the templates with what every page shows: the read-only banner, the
    version, the Redis server time the page was read at."""

    def __init__(self, read_only: bool, read_only_how: str, version: str) -> None:
        self.env = _environment()
        self.common = {"read_only": read_only, "read_only_how": read_only_how, "version": version}

    def render(
        self,
        request: Request,
        template: str,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        """The whole page, or only its ``live`` block when the page's script asks."""
        context = {"request": request, "nav": None, "now_ms": None, **self.common, **context}
        page = self.env.get_template(template)
        if request.headers.get(FRAGMENT_HEADER) == "live" and "live" in page.blocks:
            body = "".join(page.blocks["live"](page.new_context(context)))
        else:
            body = page.render(context)
        headers = {**PAGE_HEADERS, **(headers or {})}
        if context["now_ms"]:  # the script's clock for relative ages
            headers["X-Gridqueue-Now-Ms"] = str(context["now_ms"])
        return HTMLResponse(body, status_code=status_code, headers=headers)

    def error(
        self,
        request: Request,
        status: int,
        error: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> HTMLResponse:
        return self.render(
            request, "error.html", status, headers, status=status, error=error, detail=detail
        )


def duration(ms: float | None) -> str:
    """850 ms, 3.2 s, 4 min, 2.5 h, 3.0 d."""
    if ms is None:
        return "-"
    ms = max(float(ms), 0.0)
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.0f} min"
    if ms < 86_400_000:
        return f"{ms / 3_600_000:.1f} h"
    return f"{ms / 86_400_000:.1f} d"


def clock(ms: int | None) -> str:
    """A Redis server time as a UTC wall clock, to the ms."""
    if ms is None:
        return "-"
    stamp = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return f"{stamp[:-3]} UTC"


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gridqueue.monitor", "templates"),
        autoescape=True,
        # A field the view leaves out renders as nothing, not as an error page.
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=duration, clock=clock, gib=gib, pretty=pretty)
    return env
