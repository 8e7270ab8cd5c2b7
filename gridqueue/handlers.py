"""User inference handlers: ``@handler("model", gpu_memory_gb=...)`` on ``fn(payload, ctx)``.

The registry is per process. A worker imports the handler modules named on its command
line, and serves the models they register.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from gridqueue.errors import InvalidModelError
from gridqueue.ledger import retry_redis

# A model's name is part of its queue's name ('gq.model.<model>') and of its ledger keys
# ('gq:model:<model>', 'gq:model:<model>:unfit'). kombu names the queue's priority lists
# '<queue>\x06\x163' ('\x06\x16' is its separator), so no control character may appear:
# model 'x\x06\x163' would share a list with model 'x'. No ':' either: model 'x:unfit'
# would share a ledger key with model 'x'. Letters, digits, '-', '_' and '.' allow neither.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

HandlerFn = Callable[[Any, "Context"], Any]


def check_model_name(model: str) -> str:
    if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
        raise InvalidModelError(
            f"invalid model name {model!r}: use 1-128 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (no ':', which separates the parts of the "
            "ledger's key names, and no control character, which kombu puts between a "
            "queue's name and its priority step)"
        )
    return model


@dataclass(frozen=True)
class Handler:
    model: str
    fn: HandlerFn
    gpu_memory_gb: float


_REGISTRY: dict[str, Handler] = {}


def handler(model: str, gpu_memory_gb: float = 0.0) -> Callable[[HandlerFn], HandlerFn]:
    """Register ``fn(payload, ctx)`` as the handler of ``model``."""
    check_model_name(model)
    if gpu_memory_gb < 0:
        raise ValueError("gpu_memory_gb must be >= 0")

    def register(fn: HandlerFn) -> HandlerFn:
        _REGISTRY[model] = Handler(model, fn, gpu_memory_gb)
        return fn

    return register


def get_handler(model: str) -> Handler | None:
    return _REGISTRY.get(model)


def registered() -> dict[str, Handler]:
    return dict(_REGISTRY)


class ProgressSink(Protocol):
    def progress(
        self, job_id: str, attempt: int, worker: str, info: str = "", stall_ms: int = 60_000
    ) -> bool: ...


class StreamSink(Protocol):
    def emit(
        self, job_id: str, attempt: int, worker: str, seq: int, chunk: Any, stall_ms: int = 60_000
    ) -> bool: ...

    def checkpoint(
        self, job_id: str, attempt: int, worker: str, position: int, state: Any
    ) -> bool: ...


@dataclass(frozen=True)
class Resume:
    """What an attempt resumes from: the last checkpoint's state, and the stream position
    it was taken at (the next chunk to emit after it)."""

    state: Any
    position: int


class Confirmation:
    """When the ledger last confirmed that an attempt is still current. Past ``within_s``
    without one (``stale_after_s``: a Redis partition, say), the attempt may belong to
    another worker already: its node may have been declared dead and its job moved."""

    def __init__(self, within_s: float) -> None:
        self.within_s = within_s
        self._at = time.monotonic()

    def record(self, current: bool) -> bool:
        if current:
            self._at = time.monotonic()
        return current

    def recent(self) -> bool:
        return time.monotonic() - self._at < self.within_s


class Context:
    """What a handler knows of its attempt, and how it reports progress."""

    # Progress writes are throttled: a tight loop calling progress() costs one Redis
    # round trip per interval, not one per call.
    progress_interval_s = 0.1

    def __init__(
        self,
        job_id: str,
        attempt: int,
        worker: str,
        sink: ProgressSink,
        stall_ms: int = 60_000,
        confirm_within_s: float = 1.0,
        stream: StreamSink | None = None,
        resume: Resume | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.worker = worker
        self.resume = resume
        self._sink = sink
        self._stream = stream
        self._position = 0  # the next chunk this attempt emits
        self._stall_ms = stall_ms
        self._last_write = 0.0
        self._confirmed = Confirmation(confirm_within_s)
        self.superseded = False

    def progress(self, info: str = "") -> bool:
        """Mark progress. Returns False once this attempt was superseded, or while it
        cannot be confirmed current (stop early, or at least do nothing irreversible)."""
        now = time.monotonic()
        if not self.superseded and now - self._last_write >= self.progress_interval_s:
            self._last_write = now
            # Progress is best-effort: a Redis blip must not fail the user's work. If it
            # lasts, the attempt's liveness lapses and the watchdog decides.
            with contextlib.suppress(RedisError):
                current = self._sink.progress(
                    self.job_id, self.attempt, self.worker, info, self._stall_ms
                )
                self.superseded = not self._confirmed.record(current)
        return not self.superseded and self._confirmed.recent()

    # -- output stream ---------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The stream position of the next chunk this attempt emits."""
        return self._position

    def seek(self, position: int) -> None:
        """Continue the stream from ``position`` (``ctx.resume.position`` when resuming).

        An attempt numbers its chunks from 0 unless it seeks: a handler that ignores
        ``ctx.resume`` starts over, and the chunks the reader already has are dropped."""
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"seek() needs a stream position >= 0, got {position!r}")
        self._position = position

    def emit(self, chunk: Any) -> bool:
        """Append a JSON chunk to the job's output stream, as chunk ``ctx.position``.

        Returns False once this attempt is superseded (the chunk is refused). Raises
        ChunkNotJSONError, ChunkTooLargeError or StreamFullError (a StreamError): the
        attempt then fails with outcome ``error``, and nothing of the chunk is written.
        A Redis blip is waited out: a retried append never duplicates a chunk."""
        if self._stream is None:
            raise RuntimeError("this context has no output stream (not run by a worker)")
        if self.superseded:
            return False
        appended = retry_redis(self._stream.emit)(
            self.job_id, self.attempt, self.worker, self._position, chunk, self._stall_ms
        )
        if not appended:
            self.superseded = True
            return False
        self._position += 1
        self._confirmed.record(True)
        return True

    def checkpoint(self, state: Any) -> bool:
        """Store a small JSON resume state, tied to the stream position now: the next
        attempt gets it as ``ctx.resume``. Returns False once this attempt is superseded.
        Raises CheckpointNotJSONError or CheckpointTooLargeError (nothing is written)."""
        if self._stream is None:
            raise RuntimeError("this context has no output stream (not run by a worker)")
        if self.superseded:
            return False
        stored = retry_redis(self._stream.checkpoint)(
            self.job_id, self.attempt, self.worker, self._position, state
        )
        if not stored:
            self.superseded = True
        return bool(stored)
