"""Each ledger script carries only the part of the prelude it uses; nothing it uses is left
out (a missing local is a runtime error in Redis, on whatever path first reaches it)."""

from __future__ import annotations

import re

import pytest

from gridqueue.keys import lua_prelude
from gridqueue.ledger import _SCRIPTS
from gridqueue.lua import (
    _prelude_statements,
    entry,
    exit_of,
    library,
    names_used,
    read_lua,
    script_source,
)

WHOLE = lua_prelude() + read_lua("_common")


def test_the_prelude_is_cut_without_losing_a_character() -> None:
    assert "".join(s.text for s in _prelude_statements()) == WHOLE


def test_every_definition_of_the_prelude_is_found() -> None:
    defined = set().union(*(s.defines for s in _prelude_statements()))
    expected = set(re.findall(r"^local\s+function\s+(\w+)", WHOLE, re.MULTILINE))
    declared = r"^local\s+(?!function\b)([\w, ]+?)\s*(?:=|$)"
    for names in re.findall(declared, WHOLE, re.MULTILINE):
        expected |= {name.strip() for name in names.split(",")}
    assert defined == expected
    assert {"NS", "NOW", "NOW_S", "clock", "bump", "emit", "key_worker", "KOMBU_UNACKED"} <= defined


@pytest.mark.parametrize("name", _SCRIPTS)
def test_a_script_has_every_prelude_name_it_uses(name: str) -> None:
    source = script_source(name)
    # Every call sets the per-call values first; all but the heartbeat end in leave().
    body = entry(name) + read_lua(name) + exit_of(name)
    assert source.endswith(body)
    prelude = source[: -len(body)]
    taken = [s for s in _prelude_statements() if s.text in prelude]
    assert "".join(s.text for s in taken) == prelude  # whole statements, in order
    have = set().union(*(s.defines for s in taken))
    every = set().union(*(s.defines for s in _prelude_statements()))
    assert (names_used(source) & every) <= have


def test_a_script_leaves_out_what_it_does_not_use() -> None:
    heartbeat = script_source("heartbeat")
    assert "local function quarantine(" not in heartbeat
    assert "local function key_job(" not in heartbeat
    assert "local function enter_beat(argv)" in heartbeat
    assert "local function enter(argv)" not in heartbeat
    assert len(heartbeat) < len(WHOLE) / 3


def test_strings_and_comments_name_nothing() -> None:
    code = "-- bump here\nlocal x = 'emit' .. [[NOW]] .. \"NS\" --[[ observe ]] .. key_job(NS)"
    assert names_used(code) == {"local", "x", "key_job", "NS"}


def test_the_library_keeps_each_script_line_for_line() -> None:
    """In the function library each body keeps its own lines, so an error's line in the
    library names the line of the script's file (Library.where)."""
    built = library(_SCRIPTS)
    text = built.text.splitlines()
    for name in _SCRIPTS:
        body = read_lua(name).splitlines()
        start = built.starts[name]
        assert text[start : start + len(body)] == body
        assert built.where(start + len(body)) == f"{name}.lua line {len(body)}"
    assert built.where(2).startswith("the key helpers")


def test_the_library_is_named_by_its_content() -> None:
    """Two gridqueue versions on one Redis must not replace each other's functions: a
    library's name, and its functions' (global in Redis), carry a hash of its text."""
    built, other = library(_SCRIPTS), library(_SCRIPTS[:-1])
    assert built == library(list(_SCRIPTS))
    assert built.name != other.name
    digest = built.name.removeprefix("gridqueue_")
    assert all(f == f"gq_{digest}_{name}" for name, f in built.functions.items())
    assert built.text.startswith(f"#!lua name={built.name}\n")


def test_every_kill_order_goes_through_order_kill() -> None:
    """A heartbeat reads a worker's kill orders only while its record's flag says there may
    be some: an order added without setting the flag would never reach the worker."""
    adds = re.compile(r"'SADD',\s*key_worker_kill\(")
    for name in (*_SCRIPTS, "_common"):
        code = read_lua(name)
        found = len(adds.findall(code))
        assert found == (1 if name == "_common" else 0), name
    helper = read_lua("_common").split("local function order_kill(", 1)[1].split("\nend\n")[0]
    assert adds.search(helper) and "'kill_orders', 1" in helper
