"""The scripts' clock: NOW in ms from TIME's reply, as a number and as the string a step
writes. The string is made from the reply's digits, not printed from the number, so it
must say the same as the number for every shape of the microseconds."""

from __future__ import annotations

import pytest

from gridqueue.ledger import Ledger
from gridqueue.lua import prelude_for

CALL = "local now, now_s = clock({ARGV[1], ARGV[2]})\nreturn {tostring(now), now_s}\n"


@pytest.mark.parametrize(
    "seconds, micros, expected",
    [
        ("1764412345", "999999", "1764412345999"),
        ("1764412345", "123456", "1764412345123"),
        ("1764412345", "5123", "1764412345005"),
        ("1764412345", "45123", "1764412345045"),
        ("1764412345", "999", "1764412345000"),
        ("1764412345", "1000", "1764412345001"),
        ("1764412345", "0", "1764412345000"),
    ],
)
def test_the_clock_string_says_what_the_number_does(
    ledger: Ledger, seconds: str, micros: str, expected: str
) -> None:
    number, string = ledger.client.eval(prelude_for(CALL) + CALL, 0, seconds, micros)
    assert string == expected
    assert number == expected  # tostring of the number: the same digits


def test_a_step_writes_the_time_it_read(ledger: Ledger) -> None:
    """The record's time fields, written from the string, are Redis's clock in ms."""
    before = ledger.time_ms()
    ledger.submit("clocked", "sim-llm", "realtime", "{}", 0, None)
    after = ledger.time_ms()
    created, updated = ledger.client.hmget(ledger.keys.job("clocked"), "created_ms", "updated_ms")
    assert created is not None
    assert before <= int(created) <= after
    assert created == updated
