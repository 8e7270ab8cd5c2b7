"""The error tree. One base, ``GridQueueError``, and a shallow tree under it.

An error's docstring is its default message, and the message says what to do next.
Control-flow signals are not errors and live with the code that raises them.
"""

from __future__ import annotations

import re

from redis.sentinel import MasterNotFoundError


class GridQueueError(Exception):
    """gridqueue failed; the message says why and what to do."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.__class__.__name__).strip())


class ConfigError(GridQueueError):
    """The configuration is invalid; fix the setting named in the message."""


class InvalidJobError(GridQueueError):
    """The job was refused before anything was written; fix the input and submit again."""


class UnknownWorkloadError(InvalidJobError):
    """Unknown workload class; use one defined in config/workloads.toml."""


class PayloadNotJSONError(InvalidJobError):
    """The payload cannot be encoded as JSON; pass dicts, lists, strings, numbers, booleans."""


class PayloadTooLargeError(InvalidJobError):
    """The payload is over the size limit; send a reference (a URL or key), not the data."""


class InvalidModelError(InvalidJobError):
    """The model name is empty or malformed; use letters, digits, '-', '_' or '.'."""


class AdmissionError(GridQueueError):
    """The fleet cannot take this job now; the message says what is missing."""


class DoesNotFitError(AdmissionError):
    """No GPU in the fleet has enough memory for this model; add a bigger GPU or a smaller model."""


class NoCapacityError(AdmissionError):
    """No live, unquarantined worker serves this model now; start one, or use a class that
    waits for capacity (wait_for_capacity in config/workloads.toml)."""


class RedisUnavailableError(GridQueueError):
    """Cannot reach Redis; start Redis or set GRIDQUEUE_REDIS_URL (or --redis) to its URL."""

    def __init__(self, url: str | None = None, cause: BaseException | str | None = None) -> None:
        self.url = None if url is None else self.mask(url)
        self.reason = self._reason(cause)
        if self.url is None and self.reason is None:
            super().__init__()
            return
        head, _, advice = (self.__doc__ or "").strip().partition("; ")
        where = f" at {self.url}" if self.url else ""
        why = f" ({self.reason})" if self.reason else ""
        super().__init__(f"{head[:1].lower()}{head[1:]}{where}{why}; {advice.rstrip('.')}")

    @staticmethod
    def mask(url: str) -> str:
        """The URL with its password (in the user info, or ``?password=``) as ``***``; each
        part of a Sentinel URL (``sentinel://...;sentinel://...``) alike."""
        if ";" in url:
            return ";".join(RedisUnavailableError.mask(part) for part in url.split(";"))
        scheme, sep, rest = url.partition("://")
        if not sep:
            return url
        before_query, question, query = rest.partition("?")
        userinfo, at, location = before_query.rpartition("@")
        if at and ":" in userinfo:
            before_query = f"{userinfo.partition(':')[0]}:***@{location}"
        query = re.sub(r"(?i)(\bpassword=)[^&#]*", r"\1***", query)
        return f"{scheme}://{before_query}{question}{query}"

    @staticmethod
    def _reason(cause: BaseException | str | None) -> str | None:
        """A short, one-line why: the OS's word for a socket error, else the message."""
        if cause is None:
            return None
        if isinstance(cause, MasterNotFoundError):
            # redis-py lists every Sentinel's client repr after ' : '; the name is enough
            asked = str(cause).partition(" : ")[0].rstrip()
            return f"{asked}: no Sentinel answered, or none knows that master"
        if isinstance(cause, BaseException):
            low = cause.__cause__ or cause.__context__
            if isinstance(low, OSError) and low.strerror:
                return low.strerror
        text = " ".join(str(cause).split()).rstrip(".")
        return text or type(cause).__name__


class BrokerUnavailableError(GridQueueError):
    """Cannot reach the broker, or it refused the login; check GRIDQUEUE_BROKER_URL (user,
    password, vhost) and that RabbitMQ is running, or unset it to use the ledger's Redis."""

    def __init__(self, url: str, cause: BaseException | str | None = None) -> None:
        self.url = RedisUnavailableError.mask(url)
        reason = RedisUnavailableError._reason(cause)
        # py-amqp prefixes the server's reply with its (class, method) ids: "(0, 0): "
        self.reason = None if reason is None else re.sub(r"^\(\d+, \d+\): ", "", reason)
        head, _, advice = (self.__doc__ or "").strip().partition("; ")
        why = f" ({self.reason})" if self.reason else ""
        advice = " ".join(advice.split()).rstrip(".")
        super().__init__(f"{head[:1].lower()}{head[1:]} at {self.url}{why}; {advice}")


class ReplicationTimeoutError(GridQueueError):
    """The write reached the Redis primary, but fewer replicas than
    GRIDQUEUE_REDIS_MIN_REPLICAS confirmed it in time, so a failover now could lose it;
    check the replicas (INFO replication), or lower GRIDQUEUE_REDIS_MIN_REPLICAS."""

    def __init__(self, message: str | None = None, job_id: str | None = None) -> None:
        self.job_id = job_id
        super().__init__(message or self.__doc__)


class JobNotFoundError(GridQueueError):
    """No such job in the ledger; check the id (terminal jobs are kept for job_retention_s)."""


class WorkerNotFoundError(GridQueueError):
    """No such worker; `gridqueue status` lists the registered ones."""


class WorkerNameInUseError(ConfigError):
    """Another live process heartbeats under this worker name; give each process its own
    --name, or stop the other one first."""


class JobTimeoutError(GridQueueError):
    """The job did not finish within the timeout; it is still tracked, call result() again."""


class JobEndedError(GridQueueError):
    """The job ended without a result."""

    def __init__(self, job_id: str, state: str, reason: str | None, error: str | None) -> None:
        self.job_id = job_id
        self.state = state
        self.reason = reason
        self.error = error
        detail = f": {error}" if error else ""
        super().__init__(f"job {job_id} ended {state} (reason: {reason}){detail}")


class JobFailed(JobEndedError):
    """The job failed; its reason says whether a retry could help."""


class JobExpired(JobEndedError):
    """The job's deadline passed before it finished."""


class JobCancelled(JobEndedError):
    """The job was cancelled."""


class JobDeadLettered(JobEndedError):
    """The job was dead-lettered as poison; inspect it, then replay it by hand."""


class StreamError(GridQueueError):
    """A handler's ctx.emit() or ctx.checkpoint() was refused; the message says why."""


class ChunkNotJSONError(StreamError):
    """ctx.emit() takes JSON values only: dicts, lists, strings, numbers, booleans, None."""


class ChunkTooLargeError(StreamError):
    """The chunk is over GRIDQUEUE_STREAM_CHUNK_MAX_BYTES; emit smaller pieces."""


class StreamFullError(StreamError):
    """The job's output stream is at its bound (GRIDQUEUE_STREAM_MAX_CHUNKS or
    GRIDQUEUE_STREAM_MAX_BYTES); emit fewer, larger chunks or raise the bound."""


class StreamGapError(StreamError):
    """A chunk would leave a gap in the stream: ctx.seek() went past the stream's end;
    seek only to ctx.resume.position."""


class CheckpointNotJSONError(StreamError):
    """ctx.checkpoint() takes JSON values only: dicts, lists, strings, numbers, booleans."""


class CheckpointTooLargeError(StreamError):
    """The resume state is over GRIDQUEUE_CHECKPOINT_MAX_BYTES; store a reference to it."""


class ExtraNotInstalledError(ConfigError):
    """This handler needs an optional extra; install it with pip install 'gridqueue[model]'."""


class InvalidInput(GridQueueError):
    """Raised by a handler: the payload is wrong, so the job fails and is never retried."""


class TransientError(GridQueueError):
    """Raised by a handler: a passing fault; the workload class decides whether to retry."""
