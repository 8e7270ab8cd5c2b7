"""The watchdog's look for lost messages right after it cuts off a frozen node: limited to
that node's models, and with no grace, since whatever the node popped may be that recent."""

from __future__ import annotations

from gridqueue.ledger import Ledger
from tests.integration.test_contract_ledger import leader, publish_without_message, register


def test_a_look_limited_to_other_models_finds_nothing(ledger: Ledger) -> None:
    register(ledger, "w1")
    lost = publish_without_message(ledger, "gone")
    token = leader(ledger)
    now_ms = ledger.time_ms() + 1

    assert ledger.find_lost_messages(token, models=["other"], published_before_ms=now_ms) == []
    # Not dropped from the published index: the look for its own model still finds it.
    assert ledger.find_lost_messages(token, models=["sim-llm"], published_before_ms=now_ms) == [
        lost
    ]
    assert ledger.client.zscore(ledger.keys.dispatch, lost) is not None


def test_without_grace_a_message_lost_just_now_is_found(ledger: Ledger) -> None:
    register(ledger, "w1")
    lost = publish_without_message(ledger, "gone")
    token = leader(ledger)

    assert ledger.find_lost_messages(token) == []  # the periodic look waits a dispatch grace
    assert ledger.find_lost_messages(token, published_before_ms=ledger.time_ms() + 1) == [lost]
