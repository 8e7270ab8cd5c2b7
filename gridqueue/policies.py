"""Retry policy: a pure decision from what happened to what happens next.

``decide()`` reads a workload class and the attempt history and answers ``Retry(after_s)``
or ``GiveUp(reason, state)``. It touches no Redis; the ledger commits its answer with a
compare-and-set on ``(job, attempt)``, so a decision made on a stale read is refused.
Waits and stops are tenacity's own strategies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tenacity import RetryCallState, stop_after_attempt, wait_exponential_jitter

from gridqueue.states import NODE_OUTCOMES, POISON_OUTCOMES, JobState, Outcome
from gridqueue.workloads import WorkloadClass


@dataclass(frozen=True)
class Retry:
    """Run another attempt after ``after_s`` seconds."""

    after_s: float


@dataclass(frozen=True)
class GiveUp:
    """End the job in ``state`` with ``reason``."""

    reason: str
    state: JobState = JobState.FAILED


Decision = Retry | GiveUp


@dataclass(frozen=True)
class EndedAttempt:
    """What the policy needs to know of an earlier attempt."""

    worker: str | None
    outcome: str | None


def node_failures(history: Sequence[EndedAttempt]) -> set[str]:
    """Distinct workers that went down (or stalled) while running this job."""
    return {a.worker for a in history if a.worker and a.outcome in POISON_OUTCOMES}


def _retry_state(attempt: int) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return state


def backoff_s(workload: WorkloadClass, attempt: int) -> float:
    """Wait before the attempt after ``attempt``: exponential, capped, with jitter."""
    if workload.backoff_max_s == 0 and workload.backoff_jitter_s == 0:
        return 0.0
    wait = wait_exponential_jitter(
        multiplier=workload.backoff_initial_s,
        max=workload.backoff_max_s + workload.backoff_jitter_s,
        exp_base=workload.backoff_multiplier,
        jitter=workload.backoff_jitter_s,
    )
    return float(wait(_retry_state(attempt)))


def decide(
    workload: WorkloadClass,
    outcome: Outcome,
    attempt: int,
    history: Sequence[EndedAttempt] = (),
    remaining_s: float | None = None,
) -> Decision:
    """Decide what follows attempt number ``attempt`` that ended with ``outcome``.

    ``history`` holds every ended attempt of the job, this one included. ``remaining_s``
    is the time left before the job's deadline, if it has one.
    """
    if outcome is Outcome.SUCCEEDED:
        raise ValueError("a succeeded attempt needs no decision")
    if outcome in (Outcome.EXPIRED, Outcome.CANCELLED):
        state = JobState.EXPIRED if outcome is Outcome.EXPIRED else JobState.CANCELLED
        return GiveUp(outcome.value, state)
    if outcome is Outcome.INVALID_INPUT:
        return GiveUp(Outcome.INVALID_INPUT.value)
    if outcome in NODE_OUTCOMES or outcome is Outcome.EVACUATED:
        if not workload.idempotent:
            # Non-idempotent: the work may have had effects; never run it twice blindly.
            # FAILED/worker_lost means "outcome unknown", whether the child or its whole
            # node died; the attempt's own record keeps which.
            lost = outcome in (Outcome.WORKER_LOST, Outcome.NODE_LOST)
            return GiveUp(Outcome.WORKER_LOST.value if lost else outcome.value)
        if (
            outcome in POISON_OUTCOMES
            and len(node_failures(history)) >= workload.poison_after_workers
        ):
            return GiveUp("poison", JobState.DEAD_LETTERED)
    if stop_after_attempt(workload.max_attempts)(_retry_state(attempt)):
        return GiveUp(outcome.value)
    after_s = backoff_s(workload, attempt)
    if remaining_s is not None and after_s >= remaining_s:
        return GiveUp("deadline", JobState.EXPIRED)
    return Retry(after_s)
