"""``GridQueue.submit`` refuses bad input before it writes anything.

No server is needed to prove "before": the client points at a port nothing listens on,
so any Redis command would raise redis' ConnectionError instead of the validation error.
The control test shows that a valid submit does reach for Redis there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import gridqueue.client
from gridqueue import GridQueue
from gridqueue.errors import (
    GridQueueError,
    InvalidJobError,
    InvalidModelError,
    PayloadNotJSONError,
    PayloadTooLargeError,
    UnknownWorkloadError,
)
from gridqueue.settings import Settings

NOWHERE = "redis://127.0.0.1:1/0"  # port 1: nothing listens, a connection is refused


@pytest.fixture(autouse=True)
def no_redis_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """submit() retries Redis for 30 s; here the first touch of Redis must surface at once."""
    monkeypatch.setattr(gridqueue.client, "retry_redis", lambda call: call)


def unreachable(**overrides: Any) -> GridQueue:
    return GridQueue(settings=Settings(redis_url=NOWHERE, **overrides))


@pytest.fixture
def gq() -> Iterator[GridQueue]:
    client = unreachable()
    yield client
    client.close()


def test_a_valid_submit_does_reach_for_redis(gq: GridQueue) -> None:
    """The control: without it, the tests below would pass even if submit wrote first."""
    with pytest.raises(redis.ConnectionError):
        gq.submit("sim-llm", {"prompt": "hello"}, workload="realtime")


def test_an_unknown_workload_names_the_known_classes(gq: GridQueue) -> None:
    with pytest.raises(UnknownWorkloadError) as caught:
        gq.submit("sim-llm", {"prompt": "hello"}, workload="real-time")
    message = str(caught.value)
    assert "'real-time'" in message
    for known in sorted(gq.ledger.workloads):
        assert known in message
    assert "config/workloads.toml" in message


class Opaque:
    pass


def circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "payload",
    [
        {"a", "b"},
        Opaque(),
        object(),
        b"raw bytes",
        float("nan"),
        {"temperature": math.inf},
        [1, -math.inf],
        {("tuple", "key"): 1},
        circular(),
    ],
    ids=["set", "instance", "object", "bytes", "nan", "inf", "-inf", "tuple-key", "cycle"],
)
def test_a_payload_that_is_not_json_is_refused(gq: GridQueue, payload: Any) -> None:
    with pytest.raises(PayloadNotJSONError) as caught:
        gq.submit("sim-llm", payload)
    assert "dicts, lists" in str(caught.value)  # says what to send instead


def test_a_payload_over_the_limit_is_refused_with_the_limit_named() -> None:
    gq = unreachable(payload_max_bytes=64)
    try:
        with pytest.raises(PayloadTooLargeError) as caught:
            gq.submit("sim-llm", {"prompt": "x" * 100})
        message = str(caught.value)
        assert re.search(r"\b64\b", message)
        assert "GRIDQUEUE_PAYLOAD_MAX_BYTES" in message
        assert "reference" in message  # what to do instead
    finally:
        gq.close()


def test_the_limit_counts_encoded_bytes_and_admits_a_payload_exactly_at_it() -> None:
    body = '{"prompt":"' + "x" * 40 + '"}'
    gq = unreachable(payload_max_bytes=len(body))
    try:
        with pytest.raises(redis.ConnectionError):  # at the limit: valid, so it goes on
            gq.submit("sim-llm", {"prompt": "x" * 40})
        with pytest.raises(PayloadTooLargeError):
            gq.submit("sim-llm", {"prompt": "x" * 41})
    finally:
        gq.close()


@pytest.mark.parametrize(
    "model",
    ["", " ", "sim llm", "-leading-dash", "x" * 129, "ünïcode", "a/b", "a\nb", None, 7, "x:3"],
    ids=[
        "empty",
        "space",
        "inner-space",
        "dash",
        "too-long",
        "unicode",
        "slash",
        "nl",
        "none",
        "int",
        "colon",  # ledger keys are '{ns}:model:<model>:unfit': model 'x:unfit' would alias 'x'
    ],
)
def test_an_empty_or_malformed_model_name_is_refused(gq: GridQueue, model: Any) -> None:
    with pytest.raises(InvalidModelError) as caught:
        gq.submit(model, {"prompt": "hello"})
    assert "letters, digits" in str(caught.value)  # says what a valid name looks like


def test_a_model_name_with_a_trailing_newline_is_refused(gq: GridQueue) -> None:
    with pytest.raises(InvalidModelError):
        gq.submit("sim-llm\n", {"prompt": "hello"})


@pytest.mark.parametrize("model", ["sim-llm", "llama3.1-8b", "A", "x" * 128, "m_2"])
def test_well_formed_model_names_pass_validation(gq: GridQueue, model: str) -> None:
    with pytest.raises(redis.ConnectionError):
        gq.submit(model, {"prompt": "hello"})


def test_the_model_is_checked_before_the_workload_and_the_payload(gq: GridQueue) -> None:
    with pytest.raises(InvalidModelError):
        gq.submit("", object(), workload="nope")


@pytest.mark.parametrize(
    "error",
    [UnknownWorkloadError, PayloadNotJSONError, PayloadTooLargeError, InvalidModelError],
)
def test_every_refusal_is_an_invalid_job_error(error: type[GridQueueError]) -> None:
    assert issubclass(error, InvalidJobError)
    assert issubclass(error, GridQueueError)
    assert str(error())  # the docstring is the default message


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"deadline_s": 0}, "deadline_s must be > 0"),
        ({"deadline_s": -1.0}, "deadline_s must be > 0"),
        ({"idempotency_key": "  "}, "idempotency_key must be a non-empty string"),
    ],
)
def test_bad_deadlines_and_keys_are_refused_before_writing(
    gq: GridQueue, kwargs: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidJobError, match=says):
        gq.submit("sim-llm", {"prompt": "hello"}, **kwargs)


@pytest.mark.parametrize("deadline_s", [math.nan, math.inf])
def test_a_deadline_that_is_not_a_finite_number_is_refused(
    gq: GridQueue, deadline_s: float
) -> None:
    with pytest.raises(InvalidJobError):
        gq.submit("sim-llm", {"prompt": "hello"}, deadline_s=deadline_s)
