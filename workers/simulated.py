"""A simulated LLM for demos, drills and tests: models ``sim-llm`` (8 GiB of GPU memory),
``sim-embed`` (1 GiB) and ``sim-llm-70b`` (140 GiB: it fits no single 80 GiB GPU).

Payload: ``{"prompt": str, "ms": int}``. It works for ``ms`` milliseconds in small steps,
calling ``ctx.progress()`` at each, and returns a text that is a deterministic function of
the prompt. Drill knobs:

- ``"crash": true`` kills its own process half-way (like an OOM kill or a segfault) on
  every attempt; ``"crash": N`` only on attempts 1..N.
- ``"fail": "transient"`` raises TransientError; ``"fail": "invalid"`` raises InvalidInput.
- ``"hang": true`` stops calling ``ctx.progress()`` half-way and blocks forever, like a
  kernel that never returns; ``"hang": N`` only on attempts 1..N.
- ``"retry_ms": M`` works ``M`` ms instead of ``ms`` on attempts after the first: a long
  first attempt for a fault to interrupt, and a short one that finishes the job.

Streaming: payload ``{"tokens": N, "ms_per_token": M}`` generates ``N`` tokens ``"tok0"``,
``"tok1"``... one every ``M`` ms, each sent with ``ctx.emit()``, and checkpoints every
``"checkpoint_every"`` tokens (default 5). An attempt that gets ``ctx.resume`` continues
from its checkpoint instead of starting over. The result is the whole text.

Every run is counted in Redis before it does anything else (``{ns}:sim:runs``, job id ->
runs started), and again when it returns (``{ns}:sim:returns``): a run killed half-way
still counts, so the audit can tell how many times a job really ran, whatever the ledger
says (see :mod:`gridqueue.audit`). A run that cannot record its start does no work. The
counts are the audit's instrument, not part of serving a job: a worker started with
``SIM_LLM_COUNT_RUNS=0`` in its environment does not keep them (the overhead benchmark,
which measures what gridqueue itself costs per job).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
import uuid
from typing import Any

from redis.exceptions import RedisError

from gridqueue import Context, InvalidInput, TransientError, handler
from gridqueue.audit import count_run
from gridqueue.ledger import retry_redis

STEP_S = 0.05
MAX_MS = 3_600_000
# Off only where nothing audits the runs (see the module docstring).
COUNT_RUNS = os.environ.get("SIM_LLM_COUNT_RUNS", "1") != "0"


def complete_text(prompt: str) -> str:
    """The simulated completion: the same prompt always gives the same text."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    return f"{prompt[::-1]} <{digest[:12]}>"


def _should_crash(knob: Any, attempt: int) -> bool:
    """A drill knob: true for every attempt, N for attempts 1..N."""
    if knob is True:
        return True
    if isinstance(knob, int) and not isinstance(knob, bool):
        return attempt <= knob
    return False


def _count(ctx: Context, token: str, returned: bool) -> None:
    """Count this run in the Redis the worker's ledger uses (the context's sink)."""
    if not COUNT_RUNS:
        return
    ledger = getattr(ctx, "ledger", None) or getattr(ctx, "_sink", None)
    client = getattr(ledger, "client", None)
    settings = getattr(ledger, "settings", None)
    if client is None or settings is None:
        return  # a context without a ledger (a unit test's fake): nothing to count into
    retry_redis(count_run)(
        client,
        settings.namespace,
        ctx.job_id,
        ctx.attempt,
        token,
        settings.job_retention_s,
        returned=returned,
    )


@handler("sim-llm", gpu_memory_gb=8.0)
@handler("sim-embed", gpu_memory_gb=1.0)
@handler("sim-llm-70b", gpu_memory_gb=140.0)  # needs more than one 80 GB GPU holds
def sim_llm(payload: Any, ctx: Context) -> dict[str, Any]:
    run = uuid.uuid4().hex
    _count(ctx, run, returned=False)  # first: a run killed at any later point still counts
    if isinstance(payload, dict) and "tokens" in payload:
        return _generate(payload, ctx, run)
    if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str):
        raise InvalidInput('sim-llm needs a payload {"prompt": str, "ms": int}')
    ms = payload.get("ms", 100)
    if ctx.attempt > 1 and "retry_ms" in payload:
        ms = payload["retry_ms"]
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= MAX_MS:
        raise InvalidInput(f"sim-llm: 'ms' and 'retry_ms' must be integers within 0..{MAX_MS}")
    fail = payload.get("fail")
    if fail == "transient":
        raise TransientError("simulated transient fault")
    if fail == "invalid":
        raise InvalidInput("simulated invalid input")
    crash_at_s = ms / 2000 if _should_crash(payload.get("crash"), ctx.attempt) else None
    hang_at_s = ms / 2000 if _should_crash(payload.get("hang"), ctx.attempt) else None
    started = time.monotonic()
    deadline = started + ms / 1000
    while (now := time.monotonic()) < deadline:
        if crash_at_s is not None and now - started >= crash_at_s:
            os.kill(os.getpid(), signal.SIGKILL)
        if hang_at_s is not None and now - started >= hang_at_s:
            threading.Event().wait()  # blocks forever, and never reports progress again
        time.sleep(min(STEP_S, deadline - now))
        ctx.progress(f"{int((time.monotonic() - started) * 1000)}/{ms} ms")
    if crash_at_s is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    with contextlib.suppress(RedisError):  # informative only: the result matters more
        _count(ctx, run, returned=True)
    return {"text": complete_text(payload["prompt"]), "worker": ctx.worker, "attempt": ctx.attempt}


MAX_TOKENS = 100_000


def _knob(payload: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = payload.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"sim-llm: {name!r} must be an integer within {low}..{high}")
    return value


def _generate(payload: dict[str, Any], ctx: Context, run: str) -> dict[str, Any]:
    """Stream ``tokens`` tokens, checkpointing every few; resume from the checkpoint."""
    tokens = _knob(payload, "tokens", 0, 0, MAX_TOKENS)
    ms_per_token = _knob(payload, "ms_per_token", 10, 0, 60_000)
    every = _knob(payload, "checkpoint_every", 5, 1, MAX_TOKENS)
    bad = payload.get("bad")  # drill knob: a chunk or a state the stream must refuse
    if bad == "chunk_not_json":
        ctx.emit({"set": {1, 2}})
    if bad == "chunk_too_large":
        ctx.emit("x" * 10_000_000)
    if bad == "checkpoint_not_json":
        ctx.checkpoint(float("nan"))
    start = 0
    if ctx.resume is not None and isinstance(ctx.resume.state, dict):
        start = int(ctx.resume.state.get("next", 0))
        ctx.seek(ctx.resume.position)
    for i in range(start, tokens):
        time.sleep(ms_per_token / 1000)
        if not ctx.emit(f"tok{i}"):
            break  # superseded: another attempt carries the job now
        if (i + 1) % every == 0:
            ctx.checkpoint({"next": i + 1})
        ctx.progress(f"{i + 1}/{tokens} tokens")
    with contextlib.suppress(RedisError):
        _count(ctx, run, returned=True)
    text = " ".join(f"tok{i}" for i in range(tokens))
    return {"text": text, "tokens": tokens, "resumed_from": start, "attempt": ctx.attempt}
