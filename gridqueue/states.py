"""Names of states and outcomes, shared by the ledger, its Lua scripts and the tools.

The transition rules themselves live in :mod:`gridqueue.statemachine` (the executable
specification) and in the ledger's Lua scripts (the implementation); a differential test
runs both on the same random histories.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"  # attempt n waits for a worker (maybe for its backoff to pass)
    RUNNING = "RUNNING"  # attempt n is claimed by a live worker
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    DEAD_LETTERED = "DEAD_LETTERED"


TERMINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.EXPIRED,
        JobState.CANCELLED,
        JobState.DEAD_LETTERED,
    }
)


class Outcome(StrEnum):
    """How one attempt ended."""

    SUCCEEDED = "succeeded"
    WORKER_LOST = "worker_lost"  # the child running it died (or stalled) while its node lived
    NODE_LOST = "node_lost"  # the whole node died, stopped or restarted under it
    ERROR = "error"  # the handler raised
    INVALID_INPUT = "invalid_input"  # the handler refused the payload: never retried
    STALLED = "stalled"
    GPU_FAULT = "gpu_fault"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    EVACUATED = "evacuated"  # an operator quarantined the node and moved its work


# Outcomes that say the *node* failed the job, not the job itself. A non-idempotent class
# never retries these blindly, and enough of them on distinct workers mark a poison job.
NODE_OUTCOMES = frozenset(
    {Outcome.WORKER_LOST, Outcome.NODE_LOST, Outcome.STALLED, Outcome.GPU_FAULT}
)

# Outcomes that may be the job's own doing (it crashed or wedged its process): the same on
# enough distinct workers marks a poison job. A GPU that fails its health check, or a whole
# node that dies (its heartbeat stops), is the node's fault, not evidence against the job.
POISON_OUTCOMES = frozenset({Outcome.WORKER_LOST, Outcome.STALLED})


class WorkerState(StrEnum):
    ALIVE = "ALIVE"
    QUARANTINED = "QUARANTINED"  # alive, but gets no new work (sick GPU or an operator)
    PROBATION = "PROBATION"  # back from a failure; gets work once the delay has passed
    DEAD = "DEAD"  # declared dead by the watchdog; its heartbeats are refused (fenced)
    STOPPED = "STOPPED"  # shut down cleanly
