"""gridqueue: a failover layer for GPU inference on Celery and Redis."""

from __future__ import annotations

from gridqueue.client import GridQueue, Job
from gridqueue.errors import (
    GridQueueError,
    InvalidInput,
    InvalidJobError,
    JobCancelled,
    JobDeadLettered,
    JobExpired,
    JobFailed,
    JobTimeoutError,
    TransientError,
)
from gridqueue.handlers import Context, handler
from gridqueue.states import JobState, Outcome

__all__ = [
    "Context",
    "GridQueue",
    "GridQueueError",
    "InvalidInput",
    "InvalidJobError",
    "Job",
    "JobCancelled",
    "JobDeadLettered",
    "JobExpired",
    "JobFailed",
    "JobState",
    "JobTimeoutError",
    "Outcome",
    "TransientError",
    "handler",
]
__version__ = "0.1.0"
