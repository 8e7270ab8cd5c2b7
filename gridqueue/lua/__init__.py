"""The ledger's Lua scripts, and how each is assembled before Redis loads it.

A script is its own ``<name>.lua`` behind a prelude: the key helpers rendered from
:mod:`gridqueue.keys` and the shared functions of ``_common.lua``. Redis compiles a script
once, but runs its whole chunk on every call, so every ``local function`` and table of the
prelude is built again on each EVALSHA, used or not; with every helper in it that was
about half the price of a heartbeat. So each script gets only the part of the prelude it
uses: the prelude is cut into its top-level statements, and a statement goes in when a
name it defines is named by the script, or by a statement already in, and so on.

The walk reads names, not meaning, and errs on the side of taking too much: any name in
the code (field names included) counts as a use, and a top-level statement that defines
nothing (there is none today) is always taken. Only strings and comments are skipped:
they cannot refer to a local. Statements keep their order, so each still sees what it
used before. On that path a script is still registered as one text, with its own SHA and the same
NOSCRIPT handling.

On Redis 7 and later the scripts are loaded instead as one function library
(:func:`library`): the whole prelude is built once, when Redis loads the library, and each
script body becomes a function of it, so a call pays for its body alone. What the prelude
reads per call (the namespace and settings in ARGV[1..6], NOW from ``TIME``) is set by
``enter(ARGV)`` at the start of every call, on both paths. :mod:`gridqueue.lua.runner`
chooses the path and calls them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import NamedTuple

from gridqueue.keys import lua_prelude

__all__ = [
    "Library",
    "entry",
    "exit_of",
    "fixed_count",
    "library",
    "read_lua",
    "script_source",
]

# Comments and strings (short and long), whose words are not names, then names.
_LEXEME = re.compile(
    r"--\[(?P<c>=*)\[.*?\](?P=c)\]"
    r"|--[^\n]*"
    r"|\[(?P<s>=*)\[.*?\](?P=s)\]"
    r"|'(?:\\.|[^'\\\n])*'"
    r'|"(?:\\.|[^"\\\n])*"'
    r"|(?P<name>[A-Za-z_]\w*)",
    re.DOTALL,
)
_LOCAL_FUNCTION = re.compile(r"local\s+function\s+([A-Za-z_]\w*)")
_LOCAL_NAMES = re.compile(r"local\s+([A-Za-z_][\w\s,]*?)\s*(?:=|$)", re.MULTILINE)


def read_lua(name: str) -> str:
    return (resources.files(__name__) / f"{name}.lua").read_text(encoding="utf-8")


def names_used(code: str) -> set[str]:
    """The names in Lua ``code``, outside its strings and comments."""
    return {m.group("name") for m in _LEXEME.finditer(code) if m.group("name")}


@dataclass(frozen=True)
class _Statement:
    text: str
    defines: frozenset[str]  # empty: always taken
    uses: frozenset[str]


def _defined(first_line: str) -> frozenset[str]:
    if match := _LOCAL_FUNCTION.match(first_line):
        return frozenset({match.group(1)})
    if match := _LOCAL_NAMES.match(first_line):
        return frozenset(name.strip() for name in match.group(1).split(","))
    return frozenset()


def _statements(prelude: str) -> list[_Statement]:
    """Cut the prelude into its top-level statements: one begins at each line that starts
    in column 0 (a ``local``, or any other statement), with the comment lines right above
    it; indented lines and closing ``end``/``}``/``)`` lines continue the one before."""
    chunks: list[list[str]] = [[]]
    comments: list[str] = []
    for line in prelude.splitlines(keepends=True):
        if line.startswith("--"):
            comments.append(line)
            continue
        starts = line[:1] not in ("", " ", "\t", "\n", "\r") and not line.startswith(
            ("end", "else", "until", "}", ")")
        )
        if starts:
            chunks.append([])
        chunks[-1].extend(comments)
        chunks[-1].append(line)
        comments = []
    chunks[-1].extend(comments)
    statements = []
    for chunk in chunks:
        code = "".join(chunk)
        first = next((line for line in chunk if not line.startswith("--")), "")
        statements.append(_Statement(code, _defined(first), frozenset(names_used(code))))
    return statements


@cache
def _prelude_statements() -> tuple[_Statement, ...]:
    return tuple(_statements(lua_prelude() + read_lua("_common")))


def prelude_for(body: str) -> str:
    """The part of the prelude that ``body`` needs, in the prelude's order."""
    statements = _prelude_statements()
    taken = [not statement.defines for statement in statements]
    wanted = set(names_used(body))
    for statement, take in zip(statements, taken, strict=True):
        if take:
            wanted |= statement.uses
    changed = True
    while changed:  # a fixed point: a statement taken may name others
        changed = False
        for i, statement in enumerate(statements):
            if not taken[i] and statement.defines & wanted:
                taken[i] = changed = True
                wanted |= statement.uses
    return "".join(s.text for s, take in zip(statements, taken, strict=True) if take)


class _Entry(NamedTuple):
    head: str  # the body's first line
    tail: str  # what follows the body
    fixed: int  # how many fixed arguments the script takes


# Every call starts here: the per-call values of the prelude, from ARGV and the clock.
# The body runs as a function whose results pass through ``leave``, which writes what
# the call tallied after its last event (see ``bump`` in ``_common.lua``); the entry
# stays on one line and the exit on its own, so the body keeps its line numbers.
ENTER = "enter(ARGV) return leave((function()\n"
EXIT = "end)())\n"
# ...except where a script takes fewer of the fixed arguments: the heartbeat, the most
# frequent call by far (a fleet of 10,000 beats 50,000 times a second), takes only the
# namespace and the event stream's cap, as ``enter_beat`` reads them, and tallies
# nothing, so it needs no exit.
_ENTRIES = {"heartbeat": _Entry("enter_beat(ARGV)\n", "", 2)}
_DEFAULT_ENTRY = _Entry(ENTER, EXIT, 6)  # ``enter`` reads ARGV[1..6]


def entry(name: str) -> str:
    """The first line of script ``name``'s body: how it reads its fixed arguments."""
    return _ENTRIES.get(name, _DEFAULT_ENTRY).head


def exit_of(name: str) -> str:
    """What follows script ``name``'s body (its last line, if any)."""
    return _ENTRIES.get(name, _DEFAULT_ENTRY).tail


def fixed_count(name: str) -> int:
    """How many of the fixed arguments (see ``_common.lua``) script ``name`` takes first."""
    return _ENTRIES.get(name, _DEFAULT_ENTRY).fixed


def _body(name: str) -> str:
    body = read_lua(name)
    return body if body.endswith("\n") else body + "\n"


@cache
def script_source(name: str) -> str:
    """A script as the ledger EVALs it: the prelude it needs, its entry, its body, then
    its exit."""
    body = entry(name) + _body(name) + exit_of(name)
    return prelude_for(body) + body


def body_line(name: str, line: int) -> int | None:
    """Line ``line`` of :func:`script_source` as a line of ``<name>.lua``, if it is one."""
    source = script_source(name)
    first = source.count("\n") - _body(name).count("\n") - exit_of(name).count("\n") + 1
    return line - first + 1 if first <= line < first + _body(name).count("\n") else None


# A script declares its function flags to Redis in a line of its text:
#   -- function flags: no-writes     it writes nothing: called with FCALL_RO (a replica too)
#   -- function flags: allow-oom     it may run when Redis is out of memory: one that frees
#                                    memory must, since Redis refuses a function without it
#                                    outright there, where an EVAL ran until its first write
_FLAGS = re.compile(r"^-- function flags: ([a-z-]+(?:, *[a-z-]+)*)$", re.MULTILINE)
_KNOWN_FLAGS = frozenset({"no-writes", "allow-oom"})


def function_flags(name: str) -> tuple[str, ...]:
    """The Redis function flags the script declares."""
    found = _FLAGS.search(read_lua(name))
    flags = tuple(f.strip() for f in found.group(1).split(",")) if found else ()
    unknown = set(flags) - _KNOWN_FLAGS
    if unknown:
        raise ValueError(f"{name}.lua declares unknown function flags {sorted(unknown)}")
    return flags


def no_writes(name: str) -> bool:
    """Whether the script declares that it writes nothing (FCALL_RO, on a replica too)."""
    return "no-writes" in function_flags(name)


@dataclass(frozen=True)
class Library:
    """The ledger's scripts as one Redis function library (``FUNCTION LOAD``).

    The library and its functions are named by a hash of the text, so two gridqueue
    versions on one Redis load two libraries side by side (function names are global in
    Redis) and never replace each other's.
    """

    name: str
    text: str
    functions: Mapping[str, str]  # script name -> function name
    starts: Mapping[str, int]  # script name -> the library line before its body's line 1
    prelude_lines: int

    def where(self, line: int) -> str:
        """Where line ``line`` of the library comes from, for an error message."""
        for script, start in self.starts.items():
            if start < line <= start + read_lua(script).count("\n"):
                return f"{script}.lua line {line - start}"
        keys = lua_prelude().count("\n")
        if 1 < line <= 1 + keys:
            return "the key helpers (gridqueue/keys.py)"
        if 1 + keys < line <= 1 + self.prelude_lines:
            return f"_common.lua line {line - 1 - keys}"
        return f"the library's own line {line}"


@cache
def _library(names: tuple[str, ...]) -> Library:
    prelude = lua_prelude() + read_lua("_common")
    lines = [prelude, "local SCRIPTS = {}\n"]
    line = 1 + prelude.count("\n") + 1  # the shebang, the prelude, the table
    starts: dict[str, int] = {}
    for name in names:
        body = _body(name) + exit_of(name)
        # The entry on the function's own line keeps the body's line numbers.
        lines.append(f"SCRIPTS[{name!r}] = function(KEYS, ARGV) {entry(name).strip()}\n{body}end\n")
        starts[name] = line + 1
        line += body.count("\n") + 2
    code = "".join(lines)
    digest = hashlib.sha1(code.encode()).hexdigest()[:16]  # a name, not a secret
    prefix = f"gq_{digest}_"
    # One call each: the library's load runs with no globals but `redis` (no `pairs`).
    for name in names:
        flags = ", ".join(f"'{flag}'" for flag in function_flags(name))
        code += (
            f"redis.register_function{{function_name = '{prefix}{name}', "
            f"callback = SCRIPTS[{name!r}], flags = {{{flags}}}}}\n"
        )
    text = f"#!lua name=gridqueue_{digest}\n{code}"
    return Library(
        name=f"gridqueue_{digest}",
        text=text,
        functions={name: prefix + name for name in names},
        starts=starts,
        prelude_lines=prelude.count("\n"),
    )


def library(names: Iterable[str]) -> Library:
    """The scripts ``names`` as one function library (see the module docstring)."""
    return _library(tuple(names))
