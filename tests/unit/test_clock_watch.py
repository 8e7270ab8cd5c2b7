"""The watchdog's check of the Redis host's clock against its own monotonic clock."""

from __future__ import annotations

from gridqueue.watchdog import ClockWatch


def test_a_steady_clock_is_no_jump() -> None:
    watch = ClockWatch(tolerance_s=0.25)
    assert watch.jumped_ms(1_000_000, 10.0, 10.002) == 0  # the first reading sets the base
    assert watch.jumped_ms(1_000_100, 10.1, 10.102) == 0
    assert watch.jumped_ms(1_060_100, 70.1, 70.105) == 0  # a minute later, all in step


def test_slow_round_trips_are_no_jump() -> None:
    """The server read its clock somewhere inside each call: a slow reply widens what
    counts as in step, it does not look like a jump."""
    watch = ClockWatch(tolerance_s=0.25)
    watch.jumped_ms(1_000_000, 10.0, 10.0)
    assert watch.jumped_ms(1_001_900, 10.1, 12.0) == 0  # a 1.9 s reply


def test_a_forward_step_of_the_server_clock_is_a_jump() -> None:
    watch = ClockWatch(tolerance_s=0.25)
    watch.jumped_ms(1_000_000, 10.0, 10.001)
    jump = watch.jumped_ms(1_000_100 + 5_000, 10.1, 10.101)  # NTP stepped it 5 s ahead
    assert 4_900 <= jump <= 5_000


def test_a_backward_step_is_a_jump_too() -> None:
    watch = ClockWatch(tolerance_s=0.25)
    watch.jumped_ms(1_000_000, 10.0, 10.001)
    assert watch.jumped_ms(1_000_100 - 3_000, 10.1, 10.101) < -2_900


def test_after_a_jump_the_new_clock_is_the_base() -> None:
    watch = ClockWatch(tolerance_s=0.25)
    watch.jumped_ms(1_000_000, 10.0, 10.0)
    assert watch.jumped_ms(1_010_100, 10.1, 10.1) != 0
    assert watch.jumped_ms(1_010_200, 10.2, 10.2) == 0
