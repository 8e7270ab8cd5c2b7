"""Celery's ``revoke`` and ``terminate`` remote-control commands, through the ledger.

Flower's revoke and terminate buttons, ``app.control.revoke(id, terminate=...)`` and
``celery control terminate <signal> <id>`` all broadcast one of these commands to every
worker. Celery's own handling would terminate the child and ack the message while the
ledger still thinks the attempt runs: the watchdog would then see its liveness lapse and
run it again. In a gridqueue worker these commands are replaced: an id that names an
attempt of a job in the ledger (``<job>.<n>``) becomes a ledger cancel, or is refused
with a reason; any other id goes to Celery's own command, unchanged.

For an attempt ``<job>.<n>``:

- the job already ended: refused, the job is unchanged;
- ``n`` is not the job's current attempt (it was superseded): refused;
- the attempt runs and the command does not terminate (a plain revoke, which in Celery
  never stops a running task): refused, the attempt runs on;
- otherwise: ``Ledger.cancel(job)``. The job ends CANCELLED (reason ``revoked``), its
  message, if still queued, is refused at claim, and a running attempt's child is killed
  by its own worker on its next heartbeat (the ledger's kill order; the signal asked for
  is not used: it is always SIGKILL, as for every attempt the ledger stops).

Nothing is added to Celery's revoked set and no child is signalled by Celery, so the
ledger and the worker cannot disagree. Every worker receives the broadcast and tries; the
ledger's cancel is atomic, so one cancels and the others answer that the job is already
cancelled. Refusals are logged with their reason and returned in the command's reply.

The checks (the current attempt, not running for a plain revoke) and the cancel are one
step in the ledger (``Ledger.cancel_attempt``): an attempt superseded or claimed after the
read that shaped the answer is refused, not cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.utils.functional import maybe_list
from celery.worker import control
from redis.exceptions import RedisError

from gridqueue.errors import JobNotFoundError
from gridqueue.keys import split_attempt_id
from gridqueue.ledger import Ledger
from gridqueue.logs import get_logger
from gridqueue.states import JobState

log = get_logger("gridqueue.revoke")

REVOKED_REASON = "revoked"


@dataclass(frozen=True)
class RevokeAnswer:
    task_id: str
    cancelled: bool  # this call cancelled the job
    ok: bool  # False: refused
    message: str
    was_running: bool = False


def attempt_of(task_id: str) -> tuple[str, int] | None:
    """``(job, n)`` if ``task_id`` has the shape of an attempt id, else None."""
    try:
        job_id, n = split_attempt_id(task_id)
    except ValueError:
        return None
    return (job_id, n) if job_id and n >= 1 else None


def revoke_attempt(ledger: Ledger, task_id: str, terminate: bool) -> RevokeAnswer | None:
    """Revoke attempt ``task_id`` through the ledger; None if the ledger knows no such job
    (the id is left to Celery's own revoke)."""
    found = attempt_of(task_id)
    if found is None:
        return None
    job_id, n = found
    try:
        record = ledger.get(job_id)
    except JobNotFoundError:
        return None
    except RedisError as exc:
        return RevokeAnswer(task_id, False, False, f"the ledger cannot be reached ({exc})")
    current = f"{job_id}.{record.attempt}"
    if record.terminal:
        why = f" ({record.reason})" if record.reason else ""
        if record.state is JobState.CANCELLED and record.reason == REVOKED_REASON:
            return RevokeAnswer(task_id, False, True, f"job {job_id} is already CANCELLED{why}")
        return RevokeAnswer(
            task_id, False, False, f"job {job_id} already ended {record.state.value}{why}"
        )
    if n != record.attempt:
        return RevokeAnswer(
            task_id, False, False, f"{task_id} is not job {job_id}'s current attempt ({current})"
        )
    running = record.state is JobState.RUNNING
    if running and not terminate:
        return RevokeAnswer(
            task_id,
            False,
            False,
            f"{task_id} is running on {record.worker}; revoke it with terminate to cancel "
            "its job (a plain revoke stops only an attempt that has not started)",
        )
    try:
        status = ledger.cancel_attempt(job_id, n, REVOKED_REASON, running_ok=terminate)
    except RedisError as exc:
        return RevokeAnswer(task_id, False, False, f"the ledger cannot be reached ({exc})")
    if status == "unknown":
        return RevokeAnswer(task_id, False, False, f"job {job_id} left the ledger")
    if status != "ok":  # it ended, was requeued or was claimed since the read: answer anew
        return revoke_attempt(ledger, task_id, terminate)
    if running:
        what = f"its worker {record.worker} kills the attempt's child"
    else:
        what = "its message will be refused at claim"
    return RevokeAnswer(
        task_id, True, True, f"job {job_id} cancelled through the ledger; {what}", running
    )


StockRevoke = Callable[..., Any]


def make_revoke(
    ledger_of: Callable[[], Ledger], stock: StockRevoke
) -> Callable[..., dict[str, str]]:
    """The ``revoke`` command of a gridqueue worker: ledger first, Celery for the rest."""

    def revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> dict[str, str]:
        ids = [str(i) for i in (maybe_list(task_id) or [])]
        answers: list[RevokeAnswer] = []
        others: list[str] = []
        for tid in ids:
            answer = revoke_attempt(ledger_of(), tid, bool(terminate))
            if answer is None:
                others.append(tid)
                continue
            answers.append(answer)
            if answer.cancelled:
                log.warning("attempt.revoked", attempt=tid, terminate=bool(terminate))
                _announce(state, answer)
            elif answer.ok:
                log.info("attempt.revoke_done_already", attempt=tid, detail=answer.message)
            else:
                log.warning("attempt.revoke_refused", attempt=tid, why=answer.message)
        parts = [f"{a.task_id}: {a.message}" for a in answers]
        if others:
            reply = stock(state, others, terminate=terminate, signal=signal, **kwargs)
            parts.append(str(reply.get("ok") or reply.get("error") or reply))
        text = "; ".join(parts)
        if answers and not any(a.ok for a in answers) and not others:
            return {"error": f"refused: {text}"}
        return {"ok": text}

    return revoke


def _announce(state: Any, answer: RevokeAnswer) -> None:
    """Tell Flower at once: the attempt's own worker may be unreachable (frozen)."""
    consumer = getattr(state, "consumer", None)
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not dispatcher.enabled:
        return
    try:
        dispatcher.send(
            "task-revoked",
            uuid=answer.task_id,
            terminated=answer.was_running,
            signum=None,
            expired=False,
        )
    except Exception as exc:  # an event is a courtesy: the cancel is done
        log.warning("attempt.revoke_event_failed", attempt=answer.task_id, error=repr(exc))


_installed = False


def install(ledger_of: Callable[[], Ledger]) -> None:
    """Replace Celery's ``revoke`` and ``terminate`` commands in this worker process."""
    global _installed
    if _installed:
        return
    stock = control.Panel.data["revoke"]
    revoke = make_revoke(ledger_of, stock)
    control.control_command(name="revoke", variadic="task_id", signature="[id1 [id2 [... [idN]]]]")(
        revoke
    )

    def terminate(state: Any, signal: Any, task_id: Any, **kwargs: Any) -> dict[str, str]:
        return revoke(state, task_id, terminate=True, signal=signal, **kwargs)

    control.control_command(
        name="terminate",
        variadic="task_id",
        args=[("signal", str)],
        signature="<signal> [id1 [id2 [... [idN]]]]",
    )(terminate)
    _installed = True
