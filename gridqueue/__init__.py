"""gridqueue: a failover layer for GPU inference on Celery and Redis."""

from __future__ import annotations

from gridqueue.async_client import AsyncGridQueue, AsyncJob
from gridqueue.client import GridQueue, Job
from gridqueue.errors import (
    GridQueueError,
    InvalidInput,
    InvalidJobError,
    JobCancelled,
    JobDeadLettered,
    JobExpired,
    JobFailed,
    JobNotFoundError,
    JobTimeoutError,
    StreamError,
    TransientError,
)
from gridqueue.handlers import Context, Resume, handler
from gridqueue.states import JobState, Outcome

__all__ = [
    "AsyncGridQueue",
    "AsyncJob",
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
    "JobNotFoundError",
    "JobState",
    "JobTimeoutError",
    "Outcome",
    "Resume",
    "StreamError",
    "TransientError",
    "handler",
]
__version__ = "0.1.0"
