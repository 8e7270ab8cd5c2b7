"""Small helpers shared by the integration and chaos tiers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gridqueue.fleet import wait_for as _wait_for

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy; fail the test with a clear message otherwise."""
    try:
        return _wait_for(predicate, timeout_s, interval_s)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None
